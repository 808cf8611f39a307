"""The classic PyTorch MNIST recipe, run the classic way: the yardstick for ``mnist_cnn``.

    python benchmarks/classic_mnist.py --data-dir DATA [--epochs 1] [--threads 0]

The recipe is the one the pytorch/examples repository has used for years (its ``mnist/main.py``):
two 3x3 convolutions (32 and 64 channels), a 2x2 max-pool, dropout 0.25, a 128-unit linear
layer, dropout 0.5 and a 10-way output with log-softmax and NLL loss; Adadelta at lr 1.0 with
StepLR gamma 0.7 per epoch; batches of 64 (1000 for testing); a ``DataLoader`` over
torchvision's ``MNIST`` with per-image ``ToTensor`` + ``Normalize((0.1307,), (0.3081,))``.
The code here is ours; only the recipe (architecture and hyperparameters) is theirs. The
``mnist_cnn`` benchmark times this whole process against ours in the same run and reports
the ratio, so the machine's speed cancels out.

Prints one JSON line: test accuracy and the seconds spent in training and testing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


class ClassicNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.drop1, self.drop2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.drop2(F.relu(self.fc1(torch.flatten(self.drop1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data-dir", required=True,
                        help="data root with MNIST/raw (torchvision layout)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    to_tensor = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.1307,), (0.3081,))])
    train = DataLoader(datasets.MNIST(args.data_dir, train=True, transform=to_tensor),
                       batch_size=64, shuffle=True)
    test = DataLoader(datasets.MNIST(args.data_dir, train=False, transform=to_tensor),
                      batch_size=1000)
    model = ClassicNet().to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            F.nll_loss(model(x), y).backward()
            optimizer.step()
        scheduler.step()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    print(json.dumps({"test_acc": correct / len(test.dataset), "train_s": round(train_s, 2),
                      "epochs": args.epochs, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()

"""Week 2: multilayer perceptrons, from backprop by hand (part1) to torch.nn and torch.optim
(part2)."""

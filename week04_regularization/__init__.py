"""Week 4: regularization (BatchNorm, Dropout, weight decay), learning-rate schedules, early
stopping, and a record-style CIFAR-10 recipe (best_cnn.py)."""

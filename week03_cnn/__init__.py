"""Week 3: convolutional networks, from a NumPy convolution to a CIFAR-10 classifier."""

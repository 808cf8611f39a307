"""Week 1: linear and logistic regression, gradient descent, and autograd."""

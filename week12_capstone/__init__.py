"""Week 12: the capstone. Plan a project as code (part1: scope, data audit, baseline, compute
budget), then run it end to end in one command (part2: a small Vision Transformer or a ResNet-style
CNN on CIFAR-10, trained, evaluated with confidence intervals, exported to ONNX and served)."""

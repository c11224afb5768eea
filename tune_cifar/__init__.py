"""tune_cifar: hyper-parameter search and cross-validation for CIFAR-10 classifiers.

Pipeline, one module each: data -> models -> train (+ features) -> trainable -> search / kfold
-> report / export -> cli. See README.md.
"""
__version__ = "0.1.0"

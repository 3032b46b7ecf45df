"""Training code for train.py: data, architectures, optimiser, augmentation, loop and evaluation.

One job a module; none of it is imported by the web app, and none of it goes into a saved model.
"""

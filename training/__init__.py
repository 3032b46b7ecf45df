"""Training code for train.py: data, architectures, optimiser, augmentation, loop, evaluation and
the calibration fit (which `flask calibrate` also runs, importing it only inside that command).

One job a module; none of it is imported by the web app, and none of it goes into a saved model.
"""

"""Model side of salient: the MAE / SimMIM models, teacher saliency extraction, the training loop.

Import the modules you need (``salient.trainer.teacher``, …); this package file imports nothing
heavy so that ``import salient.trainer`` stays cheap and side-effect free.
"""

"""salient: attention-guided masked image modeling with an offline Zarr saliency store.

The sub-packages live in the repository's top-level folders (see pyproject's package-dir):
``salient.pipeline`` (pipeline/), ``salient.store`` (store/), ``salient.trainer`` (trainer/),
``salient.jobs`` (jobs/).
"""

__version__ = "0.1.0"

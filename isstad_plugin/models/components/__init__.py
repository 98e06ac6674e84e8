"""Plumbing every plugin model shares (the ``components`` of anomalib's own models, for plugins).

- :mod:`.base`: ``PluginModel``, the anomalib contract and checks both models inherit;
- :mod:`.pre_processing`: resize-only pre-processing and the refusal of a normalising one;
- :mod:`.evaluation`: image and pixel metrics;
- :mod:`.arguments`: checks of numeric options;
- :mod:`.checkpoints`, :mod:`.export`, :mod:`.resume`: safe checkpoints and exports, resumed fits;
- :mod:`.quantization`: INT8 exports that keep the anomaly map's smoothing in floating point;
- :mod:`.guard_rails`: a warning before a fit of many hours, DataLoader workers fitted to the cores;
- :mod:`.seeding`: seedable batch augmentations.
"""

"""The benchmark suite: every registered language, every method, the same prompts, seeds and steps.

- :mod:`~polybridge.bench.suites`: the prompt sets (synthetic ``general`` and ``culture`` with ground truth,
  hand-written ``curated`` MC-18-style prompts);
- :mod:`~polybridge.bench.translate`: the ``translate`` baseline's dictionary, built from the grammars;
- :mod:`~polybridge.bench.metrics`: attribute accuracy (the ground-truth scorer), CLIPScore and FID (torchmetrics,
  on the world's own CLIP or the CLIP model a registry entry names);
- :mod:`~polybridge.bench.runner`: the methods and the run (:func:`~polybridge.bench.runner.run_bench`);
- :mod:`~polybridge.bench.report`: ``report.md``, ``report.html``, ``results.json``, grids and plots.

It sits beside :mod:`polybridge.eval` (which it builds on): it reads the pipeline, branches, encoders and registry
below it, and the world CLIP's model class from :mod:`polybridge.embedded.native_encoders` (where that model is
defined). ``polybridge bench`` is its command line.
"""

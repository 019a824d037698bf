"""Training: the branch trainer (:mod:`~polybridge.training.trainer`), its data
(:mod:`~polybridge.training.branch_data`), checkpoints and SNR weighting. The embedded default's builders live in
:mod:`polybridge.embedded`."""

"""The embedded default's builders: what ``scripts/build_*.py`` run to make the weights polybridge ships.

No machine that builds or tests polybridge reaches a model hub, so the project trains its own small models on its
synthetic world, each seeded and resumable (data order a pure function of (seed, step)):

- :mod:`~polybridge.embedded.tiny_backbone`: ``polybridge-tiny``, a Stable Diffusion architecture at toy size
  (``scripts/build_default.py``);
- :mod:`~polybridge.embedded.native_encoders`: one tiny CLIP text encoder per language, trained contrastively on
  its own captions (``scripts/build_encoders.py``), and the model class the benchmark loads them with;
- :mod:`~polybridge.embedded.world_clip`: the English one, the synthetic world's CLIP for CLIPScore and FID
  (``scripts/build_encoders.py --world-clip``).

The ground-truth scorer's model lives with the world (:mod:`polybridge.synthetic.scorer`), its training loop in
``scripts/build_scorer.py``. The branch trainer (:mod:`polybridge.training`) imports nothing from here: what both
use (seeds, the learning-rate schedule, rendered batches) lives below, in :mod:`polybridge.seeding`,
:mod:`polybridge.schedules` and :mod:`polybridge.synthetic.batches`.
"""

"""polybridge: one frozen English text-to-image backbone, many native-language branches.

Importing the package is cheap: heavy libraries (torch, diffusers, transformers) are imported
by the modules that need them, so ``polybridge registry list`` answers instantly.
"""

__version__ = "0.1.0"

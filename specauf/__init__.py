"""spec-auf: train masked block drafters with Accept-Until-Fail loss masking."""
__version__ = "0.1.0"

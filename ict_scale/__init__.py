"""ict_scale: consistency models trained with iCT at cluster scale."""
__version__ = "0.1.0"

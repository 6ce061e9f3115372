"""Training-speed benchmark of the real iCT step: `python -m ict_scale.bench` (see __main__)."""

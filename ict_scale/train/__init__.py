"""Training: state, EMA, the iCT step and the loop. Entry point: `python -m ict_scale.train`."""

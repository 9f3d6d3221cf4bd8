"""What a denoiser predicts, in diffusers' spelling: the names the loader, the registry and
the UI share (files and A1111's yamls say "eps" and "v"; `models.prediction` reads those)."""

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (EPSILON, V_PREDICTION)

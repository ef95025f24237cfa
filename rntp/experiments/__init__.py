"""Experiments on trained models: held-out evaluation (`evaluate`), downstream tasks through
lm-evaluation-harness (`downstream`), sweeps of designs and seeds (`sweep`) and their comparison with
intervals (`compare`)."""

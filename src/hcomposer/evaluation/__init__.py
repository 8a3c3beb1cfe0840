"""Evaluation of trained runs: the suite (loss, lm-eval, NIAH, MQAR curve, efficiency)."""

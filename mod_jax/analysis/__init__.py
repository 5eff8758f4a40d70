"""Analysis of a configured model: analytic and XLA-counted FLOPs and compiled memory of a step."""

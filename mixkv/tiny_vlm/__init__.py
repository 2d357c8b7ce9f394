"""The tiny VLM: a LLaVA whose vision encoder is trained in this repository on synthetic
character-cell images, in front of the frozen Qwen2.5-Coder-0.5B-Instruct (see docs/tiny-vlm.md).

``images`` draws the pictures and their per-cell labels, ``model`` assembles the LLaVA directory,
``train`` trains the vision tower and projector, ``tasks`` turns the families into evaluation tasks,
``demo`` runs the image demo with its heat map of kept image tokens.
"""

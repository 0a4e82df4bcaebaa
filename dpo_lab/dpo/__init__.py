"""Direct Preference Optimisation: the loss, the toy derivation, and the FSDP + QLoRA trainer."""

"""medlora: LoRA fine-tuning of a small chat model on medical Q&A, written out by hand.

Read the modules in the order README.md gives ("Layout and reading order"); docs/walkthrough.md
follows the whole plan step by step. Nothing is imported here, so `python -m medlora.X` stays fast.
"""

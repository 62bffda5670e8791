"""prolong_lit: long-context continued pretraining of Llama-3 (the ProLong recipe) with PyTorch Lightning."""

__version__ = "0.1.0"

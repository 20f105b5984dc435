"""Models leaving budgetlm for other tools' formats (Hugging Face transformers) and coming back."""

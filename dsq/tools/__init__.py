"""Commands on finished or running runs: eval, generate, export to Hugging Face."""

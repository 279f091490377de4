"""Package data: the Counterfact known-facts prompts (known_1000.json). See README.md here."""

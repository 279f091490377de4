"""Package data: the Counterfact known-facts prompts (known_1000.json) and the LRE relations
(lre/<group>/<relation>.json). Provenance and licenses in README.md here."""

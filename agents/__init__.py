"""The reasoning of hybrid-serve: routing, confidence, prompts, citations. No Ray imports here."""

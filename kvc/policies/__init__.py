"""The vocabulary every part of kvc imports: the policy artifact, head kinds, token classes."""

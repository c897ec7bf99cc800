"""Speculative decoding with the checkpoint's MTP layer (issue 10): drafts, verification, acceptance."""

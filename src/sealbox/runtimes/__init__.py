"""Isolation tiers behind one interface (`base.Runtime`), found through `registry`."""

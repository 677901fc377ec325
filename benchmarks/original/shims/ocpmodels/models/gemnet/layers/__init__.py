"""Stub package: the original imports it; its MD17 models with the exp basis never use it."""

"""Stub: the original imports GemNet's RadialBasis; its MD17 models with the exp basis never build it."""


class RadialBasis:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("not needed by the MD17 exp-basis models")

"""Adapters against their base: the adapter files (``files``), the analysis the adapter rules read (``analysis``),
the forecast of peft's merge (``forecast``, ``lowrank``), peft itself as the judge (``oracle``, ``confirm``) and
``--deep`` (``deep``). Nothing here imports ``tieaudit.rules``."""

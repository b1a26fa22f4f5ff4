"""The commands of ``qtrader`` (``qtrader.cli``), one module per group: ``workers`` (the four
workloads), ``local`` (``up``, ``ess``, ``policy``, ``health``), ``research`` (``model train``,
``backtest``), ``tools`` (``bench``, ``stress``); ``args`` holds the argument types they share.
Each module adds its parsers and names the function that runs each of its commands."""

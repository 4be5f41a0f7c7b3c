"""Built-in demo scenarios (the failure modes of the project's first test bench, a deep MLP) and the training script that runs them.

:mod:`icsmon.demo.scenarios` describes them without importing torch (``icsmon demo --list`` works
without it); :mod:`icsmon.demo.train` builds and trains them in a subprocess with the agent.
"""

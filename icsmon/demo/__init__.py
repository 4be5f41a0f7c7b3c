"""Built-in demo scenarios (the seed's failure modes) and the training script that runs them.

:mod:`icsmon.demo.scenarios` describes them without importing torch (``icsmon demo --list`` works
without it); :mod:`icsmon.demo.train` builds and trains them in a subprocess with the agent.
"""

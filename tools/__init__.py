"""The code behind the executables in this folder: load generation
(``loadgen``), benchmarks (``bench``), plots, the replay check
(``replaylib``) and the chaos harness (``chaoslib``).

Not runtime code: the engine never imports it. From a checkout it is the
package ``tools`` (each executable puts the repository root on ``sys.path``,
see ``_bootstrap``); installed, the same modules are ``batchscheduler_tools``
(pyproject.toml), so inside the package imports are relative.
"""

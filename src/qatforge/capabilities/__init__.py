"""The capability checks that need the exporters' own packages: :mod:`qatforge.capabilities.install`
writes the install-time facts (``python -m qatforge.capabilities write``, run by ``make install``),
:mod:`qatforge.capabilities.torchao` counts the modules each torchao scheme quantizes (torch, in the
build_base job). The facts are read at parse time by :mod:`qatforge.spec.capabilities`.
"""

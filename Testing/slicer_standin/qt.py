"""Stand-in for ``qt`` (PythonQt): empty on purpose.

RefNetSegmentRefine's Logic never uses Qt, and the Widget is not driven by the tests, so nothing
here pretends to be a widget. The module only has to import.
"""

# Stand-in: packaging is Slicer's; the install tree is what this check inspects.

"""idesign experiments: one study per module, each with ``main(config)``, ``QUICK`` and ``FULL`` presets."""

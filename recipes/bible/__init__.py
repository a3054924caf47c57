"""Bible style transfer (Carlson, Riddell & Rockmore 2018): verse-aligned English editions."""

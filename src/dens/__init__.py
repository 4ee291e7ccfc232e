"""dens: BI-RADS breast-density classification from screening mammograms, built for throughput."""

__version__ = "0.1.0"

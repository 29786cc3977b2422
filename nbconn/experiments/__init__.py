"""Small helpers one notebook needs, one module per notebook (nbNN.py); the library proper does not import them."""

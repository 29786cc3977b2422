"""What the notebooks run with the instruments: one module per notebook (nbNN.py) and the experiments they share.

``measure`` (N connects, summarised), ``acceptq`` (a burst against a small accept queue), ``synretry`` (SYN
retransmissions and the timer wheel), ``eyeballs`` (nginx's walk vs RFC 8305), ``record``/``data`` (the recorded
datasets in data/), ``table`` (the table a notebook shows).  They import the core, the lab and the nginx side,
never the view or the CLI.
"""

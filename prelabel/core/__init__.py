"""The numbers of prelabel, in pure numpy: vector maps and exact neighbor
search, voting, the adapter, label propagation and calibration. Nothing in
``prelabel.core`` imports FiftyOne or talks to an index (the adapter
imports torch lazily, to train its heads)."""

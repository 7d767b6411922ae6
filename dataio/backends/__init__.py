"""The data back ends behind one interface (``source.DataSource``), their registry
(``registry``), the batch contract (``batch``) and what a torch loader worker does per
batch (``batcher``, ``views``)."""

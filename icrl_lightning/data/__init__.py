"""The data side: the offline dataset on disk (``dataset``), the packed replay stream
(``stream``), context analysis of packed sequences (``context``) and the ``ReplayDataModule``
that ties them together (``module``)."""

from icrl_lightning.data.context import conflicts, nearest_visits, teacher_actions
from icrl_lightning.data.module import MapList, ReplayDataModule
from icrl_lightning.data.stream import BATCH_FIELDS, SET_ORDERS, ReplayLoader, ReplayStream

__all__ = ["BATCH_FIELDS", "SET_ORDERS", "MapList", "ReplayDataModule", "ReplayLoader", "ReplayStream",
           "conflicts", "nearest_visits", "teacher_actions"]

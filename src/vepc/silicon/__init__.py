"""The SGX processor model: EPC sections, the EPCM, ENCLS leaves, logical processors, MSRs, CPUID.

>>> from vepc.silicon import Processor, ProcessorConfig, EpcSection
>>> from vepc.types import PhysAddr
>>> cpu = Processor(ProcessorConfig(sections=(EpcSection(PhysAddr(0x80000000), 1 << 20, node=0),)))
>>> cpu.lp(0).encls(3, rcx=0x80000000)     # EREMOVE of a free page: success
0
"""

from vepc.silicon.epc import EpcLayout, EpcSection
from vepc.silicon.epcm import Epcm
from vepc.silicon.faults import ArchFault, GeneralProtection, InvalidOpcode, PageFault
from vepc.silicon.lp import LogicalProcessor
from vepc.silicon.memory import HostOperandMemory, OperandMemory, PhysicalMemory
from vepc.silicon.processor import DEFAULT_FEATURE_CONTROL, Processor, ProcessorConfig

__all__ = ["EpcLayout", "EpcSection", "Epcm", "ArchFault", "GeneralProtection", "InvalidOpcode", "PageFault",
           "LogicalProcessor", "HostOperandMemory", "OperandMemory", "PhysicalMemory", "Processor",
           "ProcessorConfig", "DEFAULT_FEATURE_CONTROL"]

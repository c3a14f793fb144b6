/**
 * NexCompute inside Jupyter Lab: the machine and the time left in the status bar, the lease
 * warnings with Extend and "Save all and download workspace", every open document saved when
 * the session stops, and a plain "This session has ended" at the end.
 *
 * It talks only to its own Jupyter server (the nexcompute_jupyter server extension under
 * /nexcompute/api/), which holds the session-scoped capability and asks the Nexus.
 */
import { JupyterFrontEndPlugin } from '@jupyterlab/application';
declare const plugin: JupyterFrontEndPlugin<void>;
export default plugin;
